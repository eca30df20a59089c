"""Local stand-in for Blueshift's API, for the demo, the tests and the benchmarks."""
