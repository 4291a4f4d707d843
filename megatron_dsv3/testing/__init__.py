"""Test utilities that ship with the package: a multi-process gloo launcher for distributed tests
and benchmarks (several simulated nodes on one machine)."""
