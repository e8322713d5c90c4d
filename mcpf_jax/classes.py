"""Class names of the class prompts, shared by the data (targets) and the model (prompts). Order is the class index."""

# The five quality levels of MCPF-IQA, worst to best; level k (0-based) scores k + 1.
QUALITY_LEVELS = ("bad", "poor", "fair", "good", "perfect")

# LIQE's nine scene categories.
SCENES = ("animal", "cityscape", "human", "indoor", "landscape", "night", "plant", "still_life", "others")

# LIQE's eleven coarse distortion classes.
DISTORTIONS = ("jpeg2000 compression", "jpeg compression", "noise", "blur", "color", "contrast", "overexposure",
               "underexposure", "spatial", "quantization", "other")
