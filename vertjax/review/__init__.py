"""Review and correct predictions in the browser; the corrections become training data.

`vertjax review PRED_DIR` (`vertjax.cli`) serves a local web app over a
folder written by `vertjax predict`: a worst-first queue (`suspicion`), the
radiographs and their named points (`catalog`), and saving to the `folder`
dataset's `annotations.csv` with a log of every change (`store`), over the
standard library's HTTP server (`server`). Pages and scripts are the files
in `static/`; nothing is fetched from the network.
"""
