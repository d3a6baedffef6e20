"""Plan: the recipe, the canonical view of a source, and the conversion plan that decides from
names, shapes and dtypes alone what every output byte is and where it goes.
"""
