# Prints what the linetable tests decode: a code object's co_firstlineno and
# length, its co_linetable in hex, and co_lines() as the oracle.
# Run: python3.X linetable.py > linetable_3.X.Y.txt
import sys
src = '''
def sample(a, b):
    x = [i * 2
         for i in range(a)]
    if b:
        y = {"k": (a,
                   b)}
    else:
        y = None

    try:
        z = x[0] / b
    except (ZeroDivisionError, IndexError):
        z = 0
    return (x,
            y, z)
'''
g = {}
exec(compile(src, "/srv/sample.py", "exec"), g)
c = g["sample"].__code__
print(sys.version_info[:3], c.co_firstlineno, len(c.co_code))
print(c.co_linetable.hex())
print(list(c.co_lines()))
