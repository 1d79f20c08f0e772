"""What every package of the project uses, and which uses none of them: writing files atomically
(`atomic_write`), the one-line error of bad input (`errors`), the types that check command-line
values (`arguments`), a file's SHA-256 (`digest`)."""
