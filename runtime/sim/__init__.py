"""The simulator: vLLM's scheduler and a whole deployment on a virtual clock.

- `steptime`: the step-time model of one replica and the profile a profiler fills.
- `scheduler`: vLLM v1's scheduler semantics (token budget, chunked prefill, KV blocks,
  preemption, prefix cache, n-gram speculation), one simulated replica.
- `cluster`: a discrete-event simulation of a deployment: the workload's arrivals, the app's
  DAG and deadline split, the router's pure policies, the simulated replicas; measured with
  the same metrics as a real run.

Pure Python and numpy: nothing here starts a process or reads a clock.
"""
