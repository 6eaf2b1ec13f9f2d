"""Scale-out: ReSTEM's candidates trained and scored on a pool of Ray actors
(pool.py), each with its own replica of the weights. Learning and serving
stay in the daemon's process; only refreshes go to the cluster. Imports the
layers below it (restem/ for the jobs it runs) and Ray, lazily: a local run
never imports it."""
