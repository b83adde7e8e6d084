-- An inbox's OAuth client id and token endpoint move into the encrypted `secret`
-- (nova/credentials.py): a token endpoint anyone with write access to the table could change
-- would receive the refresh token with the next refresh, and the client id names the Google
-- Cloud project behind it. From now on `secret` seals {"client_id", "token_uri",
-- "client_secret", "refresh_token"} and saving leaves both columns NULL.
--
-- SQL cannot re-encrypt the rows already here (it has no key), so they stay as they are:
-- reading takes client_id and token_uri from these columns when the sealed value lacks them,
-- and the next save of the row (`nova inbox add` again, or a rotated refresh token) seals it
-- whole. Whatever a row names, refresh tokens are posted to GMAIL_TOKEN_URI only.
ALTER TABLE flux_inbox_credentials
    ALTER COLUMN client_id DROP NOT NULL,
    ALTER COLUMN token_uri DROP NOT NULL;

COMMENT ON COLUMN flux_inbox_credentials.client_id IS
    'Rows saved before 0009 only; NULL once the row is saved again (then inside secret)';
COMMENT ON COLUMN flux_inbox_credentials.token_uri IS
    'Rows saved before 0009 only; NULL once the row is saved again (then inside secret)';
