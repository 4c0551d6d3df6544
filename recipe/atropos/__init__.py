"""GRPO training in verl on rollouts from Atropos environments.

The trajectory API client, the conversion of Atropos scored groups into verl
``DataProto`` batches, and the merge of Atropos token-level advantages with
verl's GRPO advantages.
"""
