"""Training on several processes and machines through Paddle's own launcher.

``python -m paddle_impl.launch`` (see ``__main__``) runs this node's share of a
job: ``nodes`` checks the layout and the master before anything starts,
``job`` runs ``paddle.distributed.launch`` with a watchdog, ``rank_exit``
wraps each rank to record how it ended, and ``ending`` turns those records
into one line naming the rank that failed. Nothing here imports Paddle.
"""
