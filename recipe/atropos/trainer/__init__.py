"""The trainer process: verl's ``RayPPOTrainer`` fed by the Atropos trajectory API.

Fetching and converting scored groups, merging Atropos token-level advantages with GRPO,
bounding the policy lag, and the step's metrics. The trainer also hosts the inference
gateway (``recipe.atropos.gateway``) in-process.
"""
