"""Further CLI subcommands, one module each; every module lists its click commands in
COMMANDS and `onnxplain.cli` adds them to the main group."""
