"""fedmi on Flower's runtimes: one ServerApp whose round loop is fedmi's `Runner`, one ClientApp
that runs fedmi's local trainers on a site's own data. The same two apps run on Flower's
deployment runtime (SuperLink + one SuperNode per site, `fedmi server/site/submit`) and on its
simulation runtime (Ray, `runtime: flower-sim`). Importing this package imports Flower.
"""

import os

# Hospitals and CI have no internet: no telemetry, no update checks, no Ray usage reports.
for _name, _value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                      ("RAY_USAGE_STATS_ENABLED", "0"), ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
                      ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")):
    os.environ.setdefault(_name, _value)
