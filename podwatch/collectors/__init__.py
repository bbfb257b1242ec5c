"""Collectors: device profiles (register maps, MQTT payload maps) and the pollers and
subscribers that turn device data into `podwatch.samples.Reading`s."""
