"""What a person reads about runs: the pictures and the self-contained HTML pages.

plots.py     the one plotting module: figures into PNG bytes, curves, the confusion matrix
run_page.py  `RUN_DIR/report.html`, one page about a run, from the files it left
compare.py   `surgery compare`: finished runs side by side (table, Markdown, JSON, a page)
paired.py    is the difference real: paired bootstrap, McNemar, Holm, verdicts against a baseline
templates/   the jinja2 templates of both pages
"""
