"""The embedded demo: the procedural shapes data set and the CPU quickstart driver.

Nothing in the framework imports this package; it uses the framework's tools and entry points
exactly as a user would (``lov15-quickstart``, ``lov15-make-shapes-dataset``).
"""
