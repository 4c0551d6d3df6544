"""The launcher process: starts the trajectory API, the trainer and the environments from one YAML."""
