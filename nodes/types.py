"""The pack's custom ComfyUI types, each defined once."""

MOA_WEIGHTS = "MOA_WEIGHTS"  # a ModelPatcher whose .model is moa_core.MoAWeights
MOA_SUBJECTS = "MOA_SUBJECTS"  # a tuple of moa_core.subject.Subject, in word order
MOA_RECORD = "MOA_RECORD"  # a moa_core.RouterRecord, filled while sampling
INSIGHTFACE = "INSIGHTFACE"  # an insightface FaceAnalysis (the type IPAdapter and InstantID use too)
MOA_IPADAPTER = "MOA_IPADAPTER"  # a ModelPatcher whose .model is moa_core.ipadapter.IPAdapter
