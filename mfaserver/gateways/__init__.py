"""Delivery channels for out-of-band factors: SMS, voice calls, e-mail.

`base` holds the small interfaces the factors depend on (`SmsGateway`,
`VoiceGateway`, `GatewayError`); each channel module (`twilio`, ...)
implements them.
"""
