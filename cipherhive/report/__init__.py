"""Self-contained HTML reports: the page shell and the SVG charts that `cipherhive ctl report`
(the operator's view) and `cipherhive node report` (a member's own view) both draw.

Neither report may fetch anything when it is opened (docs/reference/cli.md): everything here
writes inline CSS and inline SVG, and escapes every string it is given.
"""
