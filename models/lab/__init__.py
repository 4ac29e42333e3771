"""The model lab: building and calibrating model sets, apart from the runtime side.

What a build needs and nothing that serves does: importing a pretrained checkpoint or a GGUF
(`pretrained`, `build_pretrained`), the trained lab profiles (`corpus`, `tokenizer`, `train`,
`build_training`, `profiles`), the int4 onnxruntime-genai build (`edge_build`), the routing
threshold's calibration (`calibration*`), and random test models (`random_model`). The
runtime side, which the edge, the cloud and the console use, stays in `models` itself: the
registry, the manifest, distribution over the bus, the edge model's loader and scoring
(`registry`, `manifest`, `manifest_schema`, `distribution`, `ort_edge`, `scoring`, `logits`,
`chat`). Nothing on the runtime side imports the lab (an import contract).
"""
