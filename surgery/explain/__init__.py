"""`surgery explain`: where a trained run looks, and what its inserted modules attend to.

command.py    the command: the CAM of the model and of the model without its inserted modules
attention.py  the inserted modules' own gates, and the model with them bypassed
figure.py     the figure for one image
"""
