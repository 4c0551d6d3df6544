"""GRPO training in verl on rollouts from Atropos environments.

One package per process: ``trainer`` (verl's trainer fed by the Atropos trajectory
API), ``gateway`` (the inference gateway the environments call, run by the trainer),
``launcher`` (every service from one YAML) and ``cpu`` (the CPU backend, registered
by ``cpu.register``). ``settings`` is the typed config all of them read.
"""
