"""VLM4Rec: the composition root. Settings, the CLI, the embedded local stack, replay,
evaluation and benchmarks live here; the parts below (`topics`, `workers`, `streams`,
`vectorstore`) never import this package, they take plain values."""

__version__ = "0.1.0"
