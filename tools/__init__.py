"""The command-line tools: each parses its options, makes one call into the ``models`` library
and turns the outcome into an exit code. Run from the repository root as
``python -m tools.<tool>``; a tool imports the library (and the option helpers here), never
another tool."""
