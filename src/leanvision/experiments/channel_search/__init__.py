"""Channel-configuration search (ReXNet Section 4): the search space in `channels`, the Optuna runner and
the Figure 2 / Table 3 report in `study`."""
