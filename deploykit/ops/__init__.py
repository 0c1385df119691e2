"""Layer 2: the export contract of every variant (reference, tolerances, custom ONNX ops, plugin), one file per
variant, plus the custom ops variants share. The registry is `deploykit.variants.VARIANTS`."""
