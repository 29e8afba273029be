"""Production traces (Azure 2023/2024, Alibaba ServeGen) and the paper's workload construction."""
