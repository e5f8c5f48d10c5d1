"""The embedding model and its files: build it, write it, read it back in any form a user holds.

Owns ``network`` (timm backbone + projection + L2 norm; local pretrained files checked against the
architecture), ``files`` (the one writer and reader of ``model.safetensors`` + ``model.yaml`` + ``input.json``),
``formats`` (the model as a timm hub folder or ONNX) and ``loading`` (THE loader: a run folder, an export folder
or a timm export folder, with the weights' sha256 and the finite-weights check; every command that takes
``--model`` goes through it).
May import: ``config``, ``data`` (the input spec), ``run_folder``, ``dist``, ``errors``, ``util``.
"""
