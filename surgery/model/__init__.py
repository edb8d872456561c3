"""The surgered model: a backbone built, probed, planned, changed and loaded, and its parameter groups.

    backbones.py  timm and torchvision backbones through the libraries' own builders and caches
    builder.py    `build(spec) -> Built`: build -> probe -> plan -> apply -> groups -> load
    paths.py      the one path syntax (dotted paths, globs at dot boundaries, `{type: X}`)
    plan.py       every surgery operation resolved, in order, before the model is touched
    insert.py     attention modules inserted before or after modules, renaming nothing
    replace.py    replace, remove, `in_chans`, a declared head: each change with what it keeps
    weights.py    weight files in, load report out: every pretrained tensor accounted for
    groups.py     every parameter to exactly one group; the layer ids of layer_decay
    views.py      a build for people (rich trees, tables) and for scripts (JSON records)
    user_code.py  a user's `module:Class`, found on sys.path or beside the spec
    modes.py      train or eval mode for a while without losing any module's own mode

Importing this package imports nothing; `from surgery.model.builder import build` does (torch).
"""
