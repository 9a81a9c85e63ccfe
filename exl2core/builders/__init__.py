"""Plan builders every plugin shares: the dense decoder (``decoder``), its MoE block (``moe``), the parallel
block (``parallel``) and the layouts of multimodal checkpoints (``multimodal``)."""
