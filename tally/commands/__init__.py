"""The `tally` CLI's commands, one module per group of commands, each named for what it holds.

A module declares its click commands at module level and lists the top-level ones in
`COMMANDS`; tally/cli.py adds them to the `tally` group. Commands parse, call the API (user
commands) or a library function (operator commands), and print: the rules live elsewhere.
"""
