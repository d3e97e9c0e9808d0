"""samstudy benchmarks: `make bench` (or `python -m benchmarks [--only NAME] [--quick]`)."""
