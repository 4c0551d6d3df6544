"""CPU backend for tests and laptops: a verl platform, a rollout backend and a checkpoint engine.

Importing this package registers nothing. verl loads :mod:`recipe.atropos.cpu.register`
in every process when ``VERL_USE_EXTERNAL_MODULES=recipe.atropos.cpu.register``; that
module is what registers the plugins.
"""
