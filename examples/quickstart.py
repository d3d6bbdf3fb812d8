"""The example from Burla's README: runs on the local cluster when none is configured."""

from burla import remote_parallel_map

my_inputs = list(range(100))


def my_function(my_input):
    print(f"processing input #{my_input}")
    return my_input * 2


results = remote_parallel_map(my_function, my_inputs)

print(f"return values: {list(results)}")
