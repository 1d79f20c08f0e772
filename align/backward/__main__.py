"""``python -m align.backward``: training-step alignment of mmdet's GHM RetinaNet and ours, or of any
two models that functions build (``--torch module:function --paddle module:function``, trained in
lockstep: `align.backward.any_pair`); exit status 1 when it fails, 2 on bad input."""
from __future__ import annotations

import sys

from align.backward.records import BackwardOptions
from align.backward.stage import first_divergence, run_backward
from align.engine.cli import options_parser
from align.engine.options import options_from
from align.ghm.pair import extra_dtype
from align.ghm.suite import run_stage


PAIR_SHAPE = "2x3x32x32"
# A pair's default learning rate: sum(output * R) has no minimum, and a larger step sends a deep
# network's loss far from where it started within a few steps.
PAIR_LR = 1e-3


def main(argv: list[str] | None = None) -> int:
    args = options_parser("backward", __doc__.split("\n\n")[0], BackwardOptions).parse_args(argv)
    opts = options_from(BackwardOptions, args, extra_dtype=extra_dtype(args),
                        paddle_threads=args.paddle_threads or _torch_threads())
    if opts.torch or opts.paddle:
        return _pair_main(opts, args.verbose)
    for flag, given in (("--map", opts.map), ("--no-carry", not opts.carry), ("--name", opts.name)):
        if given:
            print(f"error: {flag} is for a pair of --torch and --paddle builders", file=sys.stderr)
            return 2
    return run_stage(lambda: run_backward(opts), label=lambda r: f"backward ({r.meta['dtype']})",
                     summary=lambda r: (f"({len(r.tensors)} compared); mmdet {r.meta['mmdet_s']:.1f} s"
                                        f"{' (replayed from the cache)' if _replayed(r) else ''}, "
                                        f"paddle {r.meta['paddle_s']:.1f} s"),
                     details=_details, first_divergence=first_divergence, verbose=args.verbose,
                     report=opts.reports / "backward.html")


def _pair_main(opts: BackwardOptions, verbose: bool) -> int:
    """Any two models trained in lockstep (`align.backward.any_pair`)."""
    from align.backward.any_pair import first_divergence as pair_divergence

    name = opts.name or "pair_backward"

    def run():
        from align.engine.cli import parse_shape
        from align.pair.run import builder_pair
        from align.backward.any_pair import train_pair
        from paddle_impl.config import get_config

        if not (opts.torch and opts.paddle):
            raise ValueError("--torch and --paddle come together: each names the builder of one side")
        if opts.ckpt:
            raise ValueError(f"--ckpt {opts.ckpt}: the mmdet checkpoint of the GHM RetinaNet; with --torch and "
                             "--paddle the builders load the weights")
        sgd = get_config()["optimizer"]
        pair = builder_pair(opts.torch, opts.paddle, name_map_file=opts.map, carry=opts.carry,
                            shape=parse_shape(opts.shape or PAIR_SHAPE), seed=opts.seed, stage=name, spill=False)
        return train_pair(pair, steps=opts.steps, lr=opts.lr or PAIR_LR, momentum=sgd["momentum"],
                          weight_decay=sgd["weight_decay"], clip=opts.clip_max_norm, dtype=opts.dtype,
                          seed=opts.seed, reports=opts.reports,
                          cache_dir=opts.build_dir / "cache" if opts.cache else None, fresh=opts.fresh)

    return run_stage(run, label=lambda r: f"{r.stage} ({r.meta['dtype']})",
                     summary=lambda r: f"({len(r.tensors)} compared over {r.meta['steps']} steps; "
                                       f"{r.headline.label} {r.headline.value:.2e} at {r.headline.where})",
                     first_divergence=pair_divergence, verbose=verbose, report=opts.reports / f"{name}.html")


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _replayed(result) -> bool:
    return result.meta["runs"][result.meta["dtype"]]["reference_cache"] == "hit"


def _details(result) -> list[str]:
    lines = []
    for title, _, rows in result.extra_tables:
        if title.startswith("Per step"):
            lines.append(title)
            for r in rows:
                lines.append(f"  step {r.step:>3}: lr {r.lr:.3e} loss {r.loss_mmdet:.6f} / {r.loss_paddle:.6f} "
                             f"rel {r.loss_rel:.1e}, grad norm {r.grad_norm_mmdet:.4f} / {r.grad_norm_paddle:.4f} "
                             f"rel {r.grad_norm_rel:.1e}{' (clipped)' if r.clipped else ''}; worst rel: grad "
                             f"{r.worst_grad_rel:.1e}, param {r.worst_param_rel:.1e}, momentum "
                             f"{r.worst_momentum_rel:.1e}, GHM acc_sum {r.ghm_acc_sum_rel:.1e}; "
                             f"ReLU flips {r.relu_flips}")
    lines.append("Worst difference per category:")
    for r in result.extra_tables[0].rows:
        lines.append(f"  {r.run} {r.category:44s} {r.worst_rel:.2e} (tol {r.tolerance:.0e}, "
                     f"{'ok' if r.within else 'OVER'}) {r.worst_tensor}")
    schedule = result.meta["lr_schedule"]
    if schedule:
        lines.append(f"learning rate over the whole schedule ({schedule['iterations']} iterations, "
                     f"{schedule['iters_per_epoch']} per epoch): max abs diff {schedule['max_abs_diff']:.1e}, "
                     f"{schedule['iterations_not_bitwise_equal']} iterations not bit-for-bit equal")
    relative = result.meta["parameter_change_relative_mmdet"]
    lines.append(f"parameter change over the run (mmdet, {result.meta['dtype']}, base lr "
                 f"{result.meta['base_lr']:g}): largest {result.meta['largest_parameter_change_mmdet']:.3e}; "
                 f"relative to each tensor's largest value: median {relative['median']:.2e}, "
                 f"max {relative['max']:.2e}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
