"""One thin module per ``macft`` command: resolve the recipe, make one library call, render the result.

``macft.cli`` imports a command's module only when that command runs, so ``macft --help`` stays fast.
"""
