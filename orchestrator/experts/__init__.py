"""Expert load balance on the driver side: where each expert lives (placement.py) and the load statistics and
re-placement plans (balancer.py). The routing itself and its balancing losses are model/."""
