"""int8 calibration data shipped with the package: recipe.json and prompts.txt (see README.md).

Read them with ``importlib.resources.files("t2r_export.calibration")``; recorded calibration
feeds are cached under the user cache directory, never here.
"""
