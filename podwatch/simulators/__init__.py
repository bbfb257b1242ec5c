"""The hardware simulator: site physics, Modbus TCP device servers, MQTT publishing, fault
scenarios and history generation. Only tests, benchmarks and the demo import it."""
