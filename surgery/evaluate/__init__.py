"""`surgery evaluate`: a trained run scored on images that never touched its training or model selection.

command.py  the command: the held-out split (or a folder, a CSV), TTA, metrics.json,
            predictions.jsonl and the pictures written into `RUN_DIR/eval/<split>/` whole
plots.py    its pictures: confusion matrices, reliability diagram, most confident mistakes
"""
