"""The inference gateway environments call: Atropos's ``/generate`` and OpenAI routes over verl's replicas.

It runs inside the trainer process and records which policy version sampled each sequence.
"""
