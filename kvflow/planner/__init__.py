"""The planner: observe load, predict the next interval, size prefill/decode pools to latency targets."""
