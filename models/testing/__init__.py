"""Test oracles, for the tests and benchmarks only (not used by the model or the tools):
``equivalence`` judges a detector against a float64 reference stage by stage."""
