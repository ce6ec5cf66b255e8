"""The applications built on the library: the ``droppath`` command, the training demo
(``droppath train``) and the benchmark (``droppath bench``).

They import the library's public names only, and the library never imports them (only
``droppath/__main__.py`` does, to run the command).
"""
