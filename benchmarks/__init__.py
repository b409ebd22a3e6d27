from ._target import select

select()  # before any benchmark module imports tp_kernels: time the installed kernels, not an unbuilt checkout
