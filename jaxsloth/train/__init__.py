"""The training wing: the jitted step (``step``), the host loop (``loop``), checkpoints (``checkpoint``),
metrics sinks (``metrics``), evaluation during training (``evaluate``) and the memory model (``memory``).

``jaxsloth.train`` the function (``jaxsloth.api.train``) is what users call; this package holds what it runs.
"""
