"""Write: execute a plan as a pipeline over row pieces, write planned shards atomically, then the
index, config and provenance; resume, preflight, unshuffle and the summary of a run.
"""
