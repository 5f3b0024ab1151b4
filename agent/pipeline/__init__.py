"""The swap pipeline: one module per stage, assembled by `engine`, driven by `runner.SwapPipeline`."""
