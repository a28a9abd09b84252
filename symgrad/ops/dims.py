"""Dimensions shared by the built-in ops, each with the index letter its gradients use."""
from ..declare import Dim

B = Dim("B", "b")  # batch rows
ROWS = Dim("B", "b", leading=True)  # batch rows, or any number of leading axes (torch's [*, C])
C = Dim("C", "i")  # columns / classes / features
K = Dim("K", "k")  # contracted features
N = Dim("N", "j")  # output features
D = Dim("D", "i")  # normalized features
