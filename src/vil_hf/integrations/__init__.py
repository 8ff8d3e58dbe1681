"""The detectors and ViL in the tools users already have: transformers' `Trainer` (`trainer`), an
`evaluate` COCO metric (`vil_hf.metrics`), timm (`vil_hf.timm`) and `vil-hf predict` (`vil_hf.predict`).

Submodules import their tool only when used; nothing here is imported by `import vil_hf`.
"""
