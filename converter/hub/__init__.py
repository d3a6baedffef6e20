"""Publish: push a verified checkpoint to the Hugging Face Hub with a model card.
"""
