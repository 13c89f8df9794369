"""The training program: its files, data, model and outputs around TFF's rounds
(`program`), the loop itself (`program_logic`), progress, releases, the kept best
model and `compare`'s arms."""
