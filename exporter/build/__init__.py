"""`recgpt-export build`: the release matrix built, proved and recorded (docs/ci.md).

matrix.py reads the matrix and plans the artifacts; run.py builds them; index.py is the
record (index.json, build.json); merge.py joins CI shards; check.py rebuilds one and
compares bytes; report.py draws report.html; resources.py says what one export needs.
"""
